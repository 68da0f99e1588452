// commercetools-mock for ctsync's tests: `node ctmock.mjs [port]` prints "ready <port>" once listening.
//
// The mock (4.4.0) implements only the setKey update action of subscriptions; the others that
// `ctsync subscription ensure` sends are added here, following the API reference.
import { CommercetoolsMock } from '@labdigital/commercetools-mock';

const mock = new CommercetoolsMock({
  enableAuthentication: true,
  validateCredentials: true,
  defaultProjectKey: 'demo',
  silent: true,
});

const actions = mock._repositories.subscription.actions;
actions.changeDestination = (_context, resource, { destination }) => {
  resource.destination = destination;
};
actions.setMessages = (_context, resource, { messages }) => {
  resource.messages = messages || [];
};
actions.setChanges = (_context, resource, { changes }) => {
  resource.changes = changes || [];
};
actions.setEvents = (_context, resource, { events }) => {
  resource.events = events || [];
};

await mock.app.listen({ port: Number(process.argv[2] || 0), host: '127.0.0.1' });
console.log(`ready ${mock.app.server.address().port}`);
const stop = () => mock.app.close().finally(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
